"""`python -m mindgap` runs the mindgap CLI."""

from mindgap.cli import main

if __name__ == "__main__":
    main()
