"""The pinned-buffer staging of stream.staged_chunks (CPU row source -> CUDA), its threading and slot logic
checked on the CPU: CUDA streams, events and pinned allocation are replaced by synchronous stand-ins,
so what is tested is the order, the data and the reader's life cycle; test_cuda.py runs it for real."""
import contextlib
import threading

import pytest
import torch

from metaclm_ext.stream import TensorRows, staged_chunks


class _Event:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


class _Stream:
    def __init__(self, device=None):
        pass

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    real_empty = torch.empty
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **kw: real_empty(*a, **kw))


class _Failing(TensorRows):
    def iter_chunks(self, chunk_rows, stop):
        for i, item in enumerate(super().iter_chunks(chunk_rows, stop)):
            if i == 3:
                raise OSError("disk went away")
            yield item


@pytest.mark.parametrize("chunk_rows, stop", [(64, 999), (1000, 1000), (7, 7), (5, 0)])
def test_staged_chunks_deliver_every_row_in_order(fake_cuda, chunk_rows, stop):
    source = TensorRows(torch.arange(3000.0).view(1000, 3))
    threads = threading.active_count()
    offsets, rows = [], []
    for offset, block in staged_chunks(source, chunk_rows, stop, torch.device("cpu")):
        offsets.append(offset)
        rows.append(block.clone())  # read now: chunk i + 1 is already staged, in the other buffer
    assert offsets == list(range(0, stop, chunk_rows))
    assert torch.equal(torch.cat(rows) if rows else torch.empty(0, 3), source.tensor[:stop])
    assert threading.active_count() == threads


def test_staged_chunks_forward_reader_errors_and_stop_the_reader(fake_cuda):
    threads = threading.active_count()
    with pytest.raises(OSError, match="disk went away"):
        list(staged_chunks(_Failing(torch.zeros(1000, 2)), 10, 1000, torch.device("cpu")))
    stream = staged_chunks(TensorRows(torch.zeros(1000, 2)), 10, 1000, torch.device("cpu"))
    next(stream)
    stream.close()  # what an op raising mid-stream does to it
    assert threading.active_count() == threads
