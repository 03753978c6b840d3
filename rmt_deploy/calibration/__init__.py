"""INT8 calibration that respects the recurrence: a corpus, calibration steps recorded
from the rolled FP32 recurrence, quantization policies and Q/DQ graphs."""
