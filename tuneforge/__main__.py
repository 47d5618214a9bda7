"""``python -m tuneforge ...`` (and ``torchrun -m tuneforge train ...``) run the CLI."""

from tuneforge.cli import main

if __name__ == "__main__":
    main()
