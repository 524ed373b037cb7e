"""edgeship.targets: device profiles (format, precisions, runtime and version, quirks). Imports nothing of ours."""
