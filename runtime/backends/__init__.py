"""Runtime backends: thin adapters over native inference libraries, chosen through the registry."""
