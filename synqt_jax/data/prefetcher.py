"""Items of an iterator made ahead in a background thread, a bounded number.

So that a step's batch is assembled while the step before runs, without
holding more batches than asked for.
"""
import queue
import threading


def prefetched(iterator, size: int):
  """Runs `iterator` in a background thread, at most `size` items ahead.

  An item is made only while fewer than `size` wait (queued or being made):
  with the one the caller holds, at most `size` + 1 exist. `size` 0: no
  thread, each item made when asked.
  """
  return iterator if size == 0 else _made_in_a_thread(iterator, size)


def _made_in_a_thread(iterator, size):
  buffer = queue.Queue()
  slots = threading.Semaphore(size)
  stopped = threading.Event()
  end = object()

  def produce():
    try:
      while True:
        while not slots.acquire(timeout=0.1):
          if stopped.is_set():
            return
        if stopped.is_set():
          return
        item = next(iterator, end)
        buffer.put((item, None))
        if item is end:
          return
    except Exception as e:  # pylint: disable=broad-except
      buffer.put((None, e))
    finally:
      iterator.close()

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item, error = buffer.get()
      slots.release()
      if error is not None:
        raise error
      if item is end:
        return
      yield item
  finally:
    stopped.set()
    thread.join()
