"""Runs on a Slurm cluster: submit (the sbatch script), the job step (start or resume the run at each job start), ls/stop/attach from the login node, several nodes through srun + accelerate."""
