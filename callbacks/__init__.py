"""Lightning callbacks for FALQON training."""
