"""WHAT runs: typed presets, grid expansion, Ray Tune stages and the command line."""
