"""When a periodic action (log, evaluate, save) falls due, as big_vision's itstime."""


def itstime(step: int, every_n_steps: int, total_steps: int,
            last: bool = True) -> bool:
  """Whether `step` (updates done) is a multiple of `every_n_steps`, or the
  last step when `last`."""
  return (every_n_steps > 0 and step % every_n_steps == 0) or (
      last and step == total_steps)
