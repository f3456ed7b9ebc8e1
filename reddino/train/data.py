"""The pretraining data stream: Parquet → Ray Data (decode, multi-crop, masks) → each Train worker.

Exact resume. Every row has a content hash (`sha256`); its first 8 bytes are the row's key. A
worker remembers the keys it trained on in the current pass over the data; checkpoints store the
union over workers. After a restart the first pass drops those keys *before* augmentation (a skip
list held by a small named Ray actor, so it reaches Ray Data tasks on any node and can be cleared
when the pass ends). The resumed run therefore neither replays nor skips a row of the pass it was in.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from reddino.config import RunConfig


def sha_to_keys(sha256: np.ndarray | list[str]) -> np.ndarray:
    """Hex content hashes → int64 row keys (first 8 bytes; collisions ~n²/2⁶⁵, negligible)."""
    return np.array([int(h[:16], 16) for h in sha256], dtype=np.uint64).view(np.int64)


class RunState:
    """Ray actor, one per live run (named after it): per dataset slot, the data pass it serves and the keys that
    pass must drop (empty unless resuming mid-pass); and the run's stop reason. Its existence also marks the run
    as driven. Slot ``p % n_slots`` serves pass ``p`` (two slots when the next pass starts early)."""

    def __init__(self) -> None:
        self._slots: dict[int, tuple[int, np.ndarray]] = {}
        self._version = 0
        self._stop_reason: str | None = None

    def set_stop_reason(self, reason: str) -> None:
        self._stop_reason = reason

    def stop_reason(self) -> str | None:
        return self._stop_reason

    def set(self, keys: np.ndarray, data_pass: int = 0, slot: int = 0) -> int:
        self._slots[int(slot)] = (int(data_pass), np.unique(np.asarray(keys, dtype=np.int64)))
        self._version += 1
        return self._version

    def get(self, slot: int = 0) -> tuple[int, np.ndarray, int]:
        data_pass, keys = self._slots.get(int(slot), (int(slot), np.empty(0, dtype=np.int64)))
        return self._version, keys, data_pass


# One namespace for every driver: a second driver of the same run on the same cluster finds the first one's actor.
NAMESPACE = "reddino"


def run_state_actor(name: str):
    """Get or create the named run-state actor of a run (lives as long as the driver that created it)."""
    import ray

    return (
        ray.remote(RunState)
        .options(name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=0, lifetime=None)
        .remote()
    )


def live_run_state(name: str):
    """The run's run-state actor if some driver on this cluster holds it, else None."""
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


class DropConsumed:
    """Ray Data batch UDF: removes rows whose key is in the run's skip list; adds the `key` column and
    the `epoch` column (the data pass, so each pass draws fresh augmentations, reproducibly)."""

    def __init__(self, actor_name: str | None, slot: int = 0) -> None:
        self.actor_name = actor_name
        self.slot = slot

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = sha_to_keys(batch["sha256"])
        batch = dict(batch)
        batch["key"] = keys
        batch["epoch"] = np.zeros(len(keys), dtype=np.int64)
        if self.actor_name is None:
            return batch
        import ray

        _, skip, data_pass = ray.get(ray.get_actor(self.actor_name, namespace=NAMESPACE).get.remote(self.slot))
        batch["epoch"][:] = data_pass
        if skip.size == 0:
            return batch
        keep = ~np.isin(keys, skip)
        if keep.all():
            return batch
        return {name: column[keep] for name, column in batch.items()}


class Augment:
    """Ray Data batch UDF: drop consumed rows, then decode + resize + multi-crop + iBOT masks.

    One operator (not two): one task and one copy per block. Crops come out as uint8 channels-last;
    :func:`crops_to_device` normalises them where the model runs."""

    def __init__(self, cfg_dict: dict[str, Any], patch_size: int, run_state_name: str | None, slot: int = 0) -> None:
        self.cfg_dict = cfg_dict
        self.patch_size = patch_size
        self.drop = DropConsumed(run_state_name, slot)
        self._transform = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._transform is None:  # built lazily, in the Ray Data worker process
            from reddino.data.augment import MultiCropTransform

            cfg = RunConfig.model_validate(self.cfg_dict)
            # uint8 crops: normalised on the training device (4x fewer bytes through the object store); with
            # crops.on_device, decoded images + crop parameters, the crops made there (crops_from_batch)
            self._transform = MultiCropTransform(
                cfg.crops, cfg.mask, patch_size=self.patch_size, resize=cfg.data.resize, seed=cfg.train.seed,
                normalize=False, gram_crops_size=gram_crops_size(cfg),
            )
        batch = self.drop(batch)
        out = self._transform({"image": batch["image"], "sha256": batch["sha256"], "epoch": batch["epoch"]})
        result = {"masks": out["masks"], "key": batch["key"]}
        for name in ("global_crops", "images", "crop_params"):
            if name in out:
                result[name] = out[name]
        local = out.get("local_crops")
        if local is not None and local.shape[1] > 0:
            result["local_crops"] = local
        if "gram_crops" in out:
            result["gram_crops"] = out["gram_crops"]
        return result


def gram_crops_size(cfg: RunConfig) -> int | None:
    """Size of the Gram teacher's own crops, when the run makes them (Gram on, frozen teacher, a size set)."""
    lc = cfg.loss
    return lc.gram_teacher_crops_size if lc.gram_enabled and lc.gram_teacher == "frozen" else None


def crops_to_device(crops, device):
    """A batch's crops on ``device`` as the model takes them: uint8 channels-last crops (the stream's) are
    moved first and normalised there; float crops (already normalised) are only moved."""
    import torch

    from reddino.data.images import normalize_on_device

    if crops.dtype == torch.uint8:
        return normalize_on_device(crops, device)
    return crops.to(device, non_blocking=True)


def crops_from_batch(batch: dict[str, Any], device, crops_cfg) -> tuple[Any, Any]:
    """(global crops, local crops or None) of a stream batch, float and normalised on ``device``: moved there (CPU
    augmentation) or made there from the decoded images and their crop parameters (``crops.on_device``)."""
    if "crop_params" in batch:
        from reddino.data.augment import POLICIES

        recipes = POLICIES[crops_cfg.policy](crops_cfg)
        from reddino.data.fastaug import augment_on_device

        return augment_on_device(batch["images"], batch["crop_params"], recipes, crops_cfg.global_crops_number,
                                 device)
    lc = batch.get("local_crops")
    return crops_to_device(batch["global_crops"], device), (crops_to_device(lc, device) if lc is not None else None)


def dataset_slots(cfg: RunConfig) -> list[str]:
    """Names of the training datasets Ray Train splits over the workers: one, or two taking turns by pass
    (``data.overlap_passes``) so the next pass's execution starts before the current one ends."""
    return ["train", "train_next"] if cfg.data.overlap_passes else ["train"]


def build_train_dataset(cfg: RunConfig, patch_size: int, run_state_name: str | None, slot: int = 0):
    """The streaming training dataset (unlabelled use: labels are never read); ``slot`` s of
    :func:`dataset_slots` serves the passes p with p % len(slots) == s."""
    from reddino.data import read_rbc_dataset

    if not cfg.data.paths:
        raise ValueError("data.paths is empty: give Parquet dirs made by `reddino ingest` or `reddino synth`")
    ds = read_rbc_dataset(
        cfg.data.paths,
        sources=cfg.data.sources,
        units=[cfg.data.unit] if cfg.data.unit else None,
        source_weights=cfg.data.source_weights,
        columns=["image", "sha256"],
        override_num_blocks=cfg.data.read_parallelism,
        file_shuffle_seed=cfg.train.seed + slot,  # slots draw different file orders
    )
    # Shuffling that streams: a new shard-file order every pass (at read time) plus a local shuffle
    # buffer in the loader. A full random_shuffle, or even randomize_block_order, is an all-to-all
    # barrier: nothing reaches the trainer until every shard has been read.
    # Blocks of one augmentation batch each, so the map tasks run in parallel even when one
    # shard holds hundreds of images (a shard is one read block).
    ds = ds.repartition(target_num_rows_per_block=cfg.data.map_batch_size)
    from ray.data import TaskPoolStrategy

    ds = ds.map_batches(
        Augment(cfg.to_dict(), patch_size, run_state_name, slot),
        batch_size=cfg.data.map_batch_size,
        num_cpus=cfg.data.cpus_per_map_task,
        resources=cfg.data.map_resources,  # e.g. {data: 0.01}: only on the data nodes
        compute=TaskPoolStrategy(size=cfg.data.map_concurrency),
    )
    return ds


class _PassReader:
    """One data pass of one shard, read by a background thread into a small queue, so a pass can start
    (Ray Data execution, shard reads, shuffle-buffer fill) while the previous one is still being trained on."""

    _END = object()

    def __init__(self, shard, batch_size: int, prefetch_batches: int, shuffle_buffer: int) -> None:
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch_batches))
        self._stop = threading.Event()
        kwargs = dict(batch_size=batch_size, drop_last=True, prefetch_batches=prefetch_batches, device="cpu",
                      local_shuffle_buffer_size=shuffle_buffer or None)
        self._thread = threading.Thread(target=self._run, args=(shard, kwargs), daemon=True, name="reddino-pass")
        self._thread.start()

    def _put(self, item) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, shard, kwargs) -> None:
        try:
            for batch in shard.iter_torch_batches(**kwargs):
                if not self._put(batch):
                    return
            self._put(self._END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
            self._put(e)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()


class BatchStream:
    """Endless per-worker batches over successive passes, recording the keys consumed in the current pass.

    With two shards (``data.overlap_passes``), pass p reads shard p % 2 and pass p + 1 starts on the other shard
    on a background thread once pass p's rows are nearly all augmented: when at most ``shuffle_buffer`` + two
    batches of its ``rows_per_pass`` (per worker) are left to train on, or after its first batch when the pass
    length is unknown. Earlier, the two passes would split the data CPUs and the current one would slow down.
    Only batches handed to training count as consumed, so exact resume is unchanged."""

    def __init__(self, shards, batch_size: int, data_pass: int, prefetch_batches: int = 2, shuffle_buffer: int = 0,
                 resuming: bool = False, rows_per_pass: int | None = None) -> None:
        self.resuming = resuming  # the first pass may be empty (a checkpoint at its very end) and is shorter
        self.shards = list(shards)  # one per dataset slot (see dataset_slots)
        self.shuffle_buffer = shuffle_buffer
        self.batch_size = batch_size
        self.data_pass = data_pass
        self.prefetch_batches = prefetch_batches
        self.rows_per_pass = rows_per_pass
        self.consumed: list[np.ndarray] = []
        self.on_pass_end = None  # callable run (on every worker) before a new pass starts
        self._readers: list[_PassReader] = []

    def consumed_keys(self) -> np.ndarray:
        return np.concatenate(self.consumed) if self.consumed else np.empty(0, dtype=np.int64)

    def _reader(self, data_pass: int) -> _PassReader:
        shard = self.shards[data_pass % len(self.shards)]
        reader = _PassReader(shard, self.batch_size, self.prefetch_batches, self.shuffle_buffer)
        self._readers.append(reader)
        return reader

    def close(self) -> None:
        for r in self._readers:
            r.close()

    def _ahead_from(self) -> int:
        """Rows of the current pass to train on before the next pass starts."""
        if self.rows_per_pass is None or self.resuming:
            return 0
        return self.rows_per_pass - self.shuffle_buffer - 2 * self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        overlap = len(self.shards) > 1
        current, ahead = self._reader(self.data_pass), None
        while True:
            produced = rows = 0
            start_ahead_at = self._ahead_from()
            for batch in current:
                keys = batch["key"].numpy()
                self.consumed.append(keys.copy())
                produced += 1
                rows += len(keys)
                if overlap and ahead is None and rows >= start_ahead_at:
                    ahead = self._reader(self.data_pass + 1)
                yield batch
            if produced == 0 and not self.resuming:
                raise RuntimeError(
                    f"a full pass over the training data gave no batch of {self.batch_size} rows on this "
                    "worker: the dataset is smaller than batch_size_per_worker × workers"
                )
            self.data_pass += 1
            self.consumed = []
            self.resuming = False
            if self.on_pass_end is not None:
                self.on_pass_end(self.data_pass)
            current, ahead = (ahead or self._reader(self.data_pass)), None
            self._readers = [current]
