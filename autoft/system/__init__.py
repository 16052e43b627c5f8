"""What autoft needs from the machine: files written whole, processes known by identity, signals."""
