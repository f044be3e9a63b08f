"""What training writes and everyone else reads: checkpoint file names, finding a checkpoint from
a checkpoint, stage or run folder, and rebuilding its trained model."""
