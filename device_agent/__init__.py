"""edgeship.device_agent: the on-device agent (model slots, OTA state machine, telemetry).

Ships to devices: must import without torch, tensorflow, onnx or coremltools, on Python 3.10.
Its modules arrive with the agent issue; today the package holds nothing but this note.
"""
