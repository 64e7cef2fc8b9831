"""Process exit codes that scripts (the SLURM launcher, the chain, CI loops) act on.

`EXIT_USAGE` is a user error, as for argparse: the message names the value, path or input to change.
`EXIT_INTERRUPTED` is sysexits' EX_TEMPFAIL ("temporary failure; try again"): the run stopped early on a
signal or `trainer.stop_after_steps`, wrote a checkpoint, and the same command continues it.
"""

EXIT_OK = 0
EXIT_FAILED = 1  # an error; re-running the same command fails the same way until the cause is fixed
EXIT_USAGE = 2  # a config value, path or input a person must change (the message names it)
EXIT_INTERRUPTED = 75
