"""The planner side: the device's memory, measured peaks, the fitted plan, its cache, and its life in a run."""
