"""Lab runtimes (docker, local), faults with guaranteed undo, drills and reports."""
