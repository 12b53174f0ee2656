"""What every layer uses: typed errors, atomic files and hashing, progress, processes, paths, the run directory."""
