"""`python -m backpropagate` is the `backprop` command (how torchrun starts each training process)."""

from backpropagate.cli import main

if __name__ == "__main__":
    main()
