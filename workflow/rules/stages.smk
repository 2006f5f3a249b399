# One rule per kind of stage (data, pretrain, train, eval, import, flops, speed, table,
# report); the experiment or the table id is the wildcard. Each job runs exactly its stage's
# one `effdetr` command (under torchrun when the stage asks for more than one GPU), and every
# value below is that stage's, looked up from the wildcard in the stage table.
# The params JSON is what makes a params edit rerun exactly the stages that read it.
for kind in RULE_KINDS:

    rule:
        name:
            kind.name
        input:
            kind.inputs,
        output:
            rule_outputs(kind),
        log:
            kind.log,
        benchmark:
            kind.benchmark
        wildcard_constraints:
            **kind.constraints,
        # the expected seconds of work from this job to the end: the longest chain starts first
        priority: kind.priority
        conda:
            "../envs/effdetr.yaml"
        threads: kind.threads(workflow.resource_settings.cores)
        # scheduler requests from params.yaml `resources:` (SLURM: --gpus/--mem/--time/--cpus-per-task)
        resources:
            gpu=kind.resource("gpu"),
            mem_mb=kind.resource("mem_mb"),
            runtime=kind.resource("runtime"),
            cpus_per_task=kind.resource("cpus_per_task"),
            # one node and one task per job (torchrun --standalone starts the ranks itself); the
            # plugin would otherwise ask for one task per GPU when a job sets `tasks`
            nodes=1,
            tasks_per_gpu=0,
        params:
            cmd=kind.command,
            json=kind.params_json(RAW_PARAMS),
        shell:
            "{params.cmd} > {log} 2>&1"
