"""`python -m shared.cli` runs the mindgap CLI."""

from shared.cli import main

if __name__ == "__main__":
    main()
