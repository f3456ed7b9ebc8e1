import pandas as pd

from reddino.infer.classify import _markdown


def test_summary_heading_names_backbone_and_probe_once():
    table = pd.DataFrame({"source": ["s1"], "cells": [3], "frac_a": [1.0]})
    text = _markdown(table, ["a"], None, {"backbone": "bb v1", "classifier": "probe",
                                          "registered": {"name": "bb-probe", "version": "2"}})
    assert text.splitlines()[0] == "# Morphology by source (backbone bb v1; linear probe bb-probe v2)"
    assert "probe probe" not in text
    knn = _markdown(table, ["a"], None, {"backbone": "bb v1", "classifier": "knn20"})
    assert knn.splitlines()[0] == "# Morphology by source (backbone bb v1; knn20 classifier)"


def test_morphology_chart_of_numbered_smears_logs_nothing(tmp_path, caplog):
    """Chula's smears are named 1, 28, ...: the chart labels them without matplotlib's per-bar notice."""
    import logging

    from reddino.infer.classify import _plot

    by_source = pd.DataFrame({"source": ["s1"], "cells": [5], "frac_a": [0.6], "frac_b": [0.4]})
    by_smear = pd.DataFrame({"group": ["1", "28"], "cells": [2, 3], "frac_a": [0.5, 2 / 3], "frac_b": [0.5, 1 / 3]})
    with caplog.at_level(logging.INFO):
        _plot(by_source, by_smear, ["a", "b"], tmp_path / "morphology.png")
    assert (tmp_path / "morphology.png").stat().st_size > 1000
    assert not [r for r in caplog.records if r.name.startswith("matplotlib")], caplog.text
