"""The stages the launcher can submit: packages that each have `STAGE.__main__.main(argv)` (what a job runs) and
`STAGE.jobs.plan_jobs(args)` (the jobs a command line becomes; see dinoforge.jobs)."""

STAGES = ("pretrain", "curate", "evaluation")
