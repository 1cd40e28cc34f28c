"""Training scripts, run with ``accelerate launch -m gen_sr.training.<script>``; see the training issue."""
