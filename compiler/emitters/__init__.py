"""edgeship.compiler.emitters: one module per target format, each turning a prepared model into an artifact.

An emitter takes the model (and what the target needs: calibration data, shape ranges)
and writes the files a package will hold; it returns what the packager needs to describe
them (paths, input and output tensors, notes for the compile report).
"""
