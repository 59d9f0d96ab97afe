"""The lab (services/tandem_lab/): reliability scenarios and fuzzing at a small size."""
