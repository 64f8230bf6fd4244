"""Video data: annotations, decoding, sampling, transforms, synthetic stand-ins, checks."""
