"""``python -m mapdet`` and ``accelerate launch -m mapdet`` enter here."""

from mapdet.cli import main

if __name__ == "__main__":
    main()
