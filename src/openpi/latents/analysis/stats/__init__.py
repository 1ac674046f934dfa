"""Statistics: bootstrap intervals (:mod:`.bootstrap`) and the clustered ones, by task (:mod:`.clustered`: the task
bootstrap, the within-task success difference with its permutation test, Holm's correction)."""
