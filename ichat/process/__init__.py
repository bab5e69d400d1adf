"""Process tools, the bottom layer: find, stop and guard processes, their shared memory,
the signals the commands capture, waiting until a server answers. Imports nothing of
iChat's above ``ichat.errors``."""
