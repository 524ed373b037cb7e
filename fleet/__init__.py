"""edgeship.fleet: the fleet manager (registry, artifact store, TUF repository, rollouts)."""
