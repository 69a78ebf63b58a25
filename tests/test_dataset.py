import numpy as np

from backpropagate.data import IGNORE_INDEX, PreparedDataset


def _dataset() -> PreparedDataset:
    lengths = [3, 5, 2, 4]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.arange(offsets[-1], dtype=np.int32) + 10
    labels = ids.copy()
    labels[:2] = IGNORE_INDEX  # a masked prompt in sample 0
    s = len(lengths)
    return PreparedDataset(
        kind="sft",
        input_ids=ids,
        labels=labels,
        sample_offsets=offsets,
        pack_offsets=np.array([0, 2, 4], dtype=np.int64),
        pack_samples=np.array([1, 2, 3, 0], dtype=np.int32),
        max_seq_length=8,
        pair_id=np.full(s, -1, np.int32),
        chosen=np.zeros(s, bool),
        kto_label=np.full(s, -1, np.int8),
    )


def test_batch_keeps_samples_apart():
    ds = _dataset()
    b = ds.batch_of(ds.row_samples(0))
    assert b.cu_seqlens.tolist() == [0, 5, 7]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert b.input_ids.tolist() == [[13, 14, 15, 16, 17, 18, 19]]
    # each sample's first label is ignored so nothing is predicted across a boundary
    assert b.labels[0, 0] == IGNORE_INDEX and b.labels[0, 5] == IGNORE_INDEX
    assert b.num_loss_tokens == 5
    assert b.max_seqlen == 5


def test_batches_cover_every_row_once_and_resume_replays_order():
    ds = _dataset()
    seen = [b.sample_index.tolist() for b in ds.batches(1, seed=3, epoch=0)]
    assert sorted(s for row in seen for s in row) == [0, 1, 2, 3]
    resumed = [b.sample_index.tolist() for b in ds.batches(1, seed=3, epoch=0, start=1)]
    assert resumed == seen[1:]
    assert ds.num_rows == 2 and ds.num_samples == 4 and ds.sample_lengths().tolist() == [3, 5, 2, 4]
