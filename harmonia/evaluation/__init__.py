"""The acceptance benchmark: curate sets from 'Maps to' ground truth, run the pipeline on them, calibrate."""
