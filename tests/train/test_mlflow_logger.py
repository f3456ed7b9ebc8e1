"""The training loop's MLflow logger: the step waits on no more than one request per ``send_every_s``."""

from mlflow.tracking import MlflowClient

from reddino.train.loop import _MLflowLogger


def test_step_logs_are_sent_at_most_every_two_seconds_and_all_at_close(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    clock = {"now": 1000.0}
    monkeypatch.setattr("reddino.train.loop.time.time", lambda: clock["now"])
    sends = []
    logger = _MLflowLogger(uri, run_id)
    real = logger.client.log_batch
    monkeypatch.setattr(logger.client, "log_batch", lambda *a, **k: sends.append(clock["now"]) or real(*a, **k))

    def steps():
        return sorted(m.step for m in client.get_metric_history(run_id, "loss"))

    for step in range(1, 5):  # four log steps 0.5 s apart: the first is sent, the rest wait for 2 s to pass
        logger.log({"loss": 1.0 / step}, step)
        assert logger.flush()
        clock["now"] += 0.5
    assert steps() == [1] and sends == [1000.0]
    logger.log({"loss": 0.1}, 5)
    assert logger.flush()  # 2 s after the first send
    assert steps() == [1, 2, 3, 4, 5] and len(sends) == 2
    logger.log({"loss": 0.05}, 6)
    assert logger.close() == 0 and steps() == list(range(1, 7))  # the last flush is forced
