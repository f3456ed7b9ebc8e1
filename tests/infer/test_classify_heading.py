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
