"""`python -m shardwise.cli`."""

from .parser import main

if __name__ == "__main__":
    main()
