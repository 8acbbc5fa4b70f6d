"""Two fixes to fairseq 0.12 running on torch 2.13 / Python 3.11, applied when the plugin is imported.

1. Checkpoints of argparse models.  fairseq calls ``torch.load(f)`` without ``weights_only``; since
   torch 2.6 that means ``weights_only=True``, which refuses any class not on torch's allowlist.
   Checkpoints of fairseq's argparse models (``transformer``, ``roberta`` and our ``qn_transformer``,
   ``qn_roberta``) store their arguments as an ``argparse.Namespace``, so ``fairseq-generate``,
   ``fairseq-interactive`` and ``RobertaModel.from_pretrained`` could not load them.  We allowlist
   exactly that one class (a plain attribute bag) instead of turning the safe loader off.

2. A native abort at exit ("terminate called without an active exception", SIGABRT, exit 134) of a
   ``fairseq-train`` / ``fairseq-eval-lm`` that finished its work.  fairseq's ``BufferedIterator``
   prefetches batches in a daemon thread (``iterators.BackgroundConsumer``), which is still building the
   next batch with torch ops when training stops mid-epoch (``--max-update``).  At interpreter shutdown
   CPython ends a daemon thread that asks for the GIL back with ``pthread_exit``; when it asks from inside
   a torch op (pybind11's ``gil_scoped_release`` destructor, a ``noexcept`` frame) the forced unwind
   reaches that frame and libstdc++ calls ``std::terminate``.  (Found with a core dump: the aborting
   thread is fairseq's consumer in ``mask_tokens_dataset.__getitem__`` -> ``THPVariable_eq`` ->
   ``~gil_scoped_release`` -> ``PyEval_RestoreThread`` -> ``pthread_exit``; the main thread in
   ``Py_FinalizeEx``.)  Our consumer checks a stop flag between batches and never blocks on a full queue
   for good; an ``atexit`` hook (run before CPython stops daemon threads) stops every live consumer and
   joins it, so no thread is inside torch when the interpreter goes away.
"""
import argparse
import atexit
import logging
import queue
import threading
import weakref

import torch
from fairseq.data import iterators

logger = logging.getLogger(__name__)
torch.serialization.add_safe_globals([argparse.Namespace])

JOIN_TIMEOUT_S = 60.0  # at exit, per consumer: the batch it is building is finished first
_CONSUMERS: "weakref.WeakSet[StoppableBackgroundConsumer]" = weakref.WeakSet()


class StoppableBackgroundConsumer(iterators.BackgroundConsumer):
    """fairseq's prefetching thread, stoppable: ``stop()`` ends it after the batch in hand."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stopping = threading.Event()
        _CONSUMERS.add(self)

    def stop(self) -> None:
        self._stopping.set()

    def _put(self, item) -> bool:
        """Queue ``item``, waiting while the queue is full unless asked to stop; False when stopped."""
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self):  # fairseq's run (iterators.py), with the stop checks
        if self.cuda_device is not None:
            torch.cuda.set_device(self.cuda_device)
        try:
            for item in self._source:
                if not self._put(item):
                    return
                self.count += 1
                if self._max_len is not None and self.count >= self._max_len:
                    break
            self._put(iterators._sentinel)
        except Exception as e:
            self._put(e)


@atexit.register
def stop_consumers() -> None:
    """Stop and join every prefetching thread still alive (registered with ``atexit``)."""
    for consumer in list(_CONSUMERS):
        if consumer.is_alive():
            consumer.stop()
            consumer.join(JOIN_TIMEOUT_S)
            if consumer.is_alive():
                logger.warning("fairseq's data prefetching thread did not stop within %.0f s", JOIN_TIMEOUT_S)


iterators.BackgroundConsumer = StoppableBackgroundConsumer  # what BufferedIterator._create_consumer builds
