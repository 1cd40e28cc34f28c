"""Schedulers with data-consistency hooks on the predicted clean sample; see the pipeline issue. Nothing here yet."""
