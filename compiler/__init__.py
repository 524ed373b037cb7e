"""edgeship.compiler: loaders, passes, emitters and validation (host side; needs the ``compiler`` extra)."""
