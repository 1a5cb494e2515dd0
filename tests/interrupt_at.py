"""Run the numlm command with a real SIGINT (or SIGNAL) sent to itself at a chosen step, not after a sleep:

    python tests/interrupt_at.py STEP WHERE [SIGTERM] numlm-arguments...

WHERE: "step" (as step STEP + 1 begins: the step is interruptible and never happens), "update"
(right after step STEP's optimizer update: the handler defers it to the step's end) or "evaluate"
(as the evaluation after step STEP begins)."""
import os
import signal
import sys

from numlm import train
from numlm.cli import main


def interrupting(method, when):
    def wrapped(self, *a, **kw):
        if when == "before" and self.step == STEP:
            os.kill(os.getpid(), SIGNAL)
        out = method(self, *a, **kw)
        if when == "after" and self.step == STEP:
            os.kill(os.getpid(), SIGNAL)
        return out
    return wrapped


if __name__ == "__main__":
    STEP, WHERE = int(sys.argv[1]), sys.argv[2]
    args = sys.argv[3:]
    SIGNAL = getattr(signal, args.pop(0)) if args and args[0].startswith("SIG") else signal.SIGINT
    T = train.Trainer
    if WHERE == "evaluate":
        T._evaluate = interrupting(T._evaluate, "before")
    else:
        T.train_step = interrupting(T.train_step, "before" if WHERE == "step" else "after")
    sys.exit(main(args))
