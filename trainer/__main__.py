"""`python -m trainer` / `torchrun … -m trainer --config F`: the `mindgap train` command, one process per rank."""

from mindgap.cli.train import main

if __name__ == "__main__":
    main()
