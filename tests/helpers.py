"""Small helpers shared by test modules."""

from pathlib import Path


def flip_byte(path: Path, offset: int) -> None:
    """Invert the lowest bit of one byte of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
