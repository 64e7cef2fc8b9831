"""Process exit codes that scripts (the SLURM launcher, the chain, CI loops) act on.

`EXIT_INTERRUPTED` is sysexits' EX_TEMPFAIL ("temporary failure; try again"): the run stopped early on a
signal or `trainer.stop_after_steps`, wrote a checkpoint, and the same command continues it.
"""

EXIT_OK = 0
EXIT_FAILED = 1  # an error; re-running the same command fails the same way until the cause is fixed
EXIT_INTERRUPTED = 75
