# One rule per row of the stage table; each runs exactly one `effdetr` command (under
# torchrun when the stage asks for more than one GPU).
# The params JSON is what makes a params edit rerun exactly the stages that read it.
for st in STAGES:

    rule:
        name:
            st.name
        input:
            stage_inputs(st),
        output:
            stage_outputs(st),
        log:
            st.log,
        conda:
            "../envs/effdetr.yaml"
        threads: st.rule_threads(workflow.resource_settings.cores)
        # scheduler requests from params.yaml `resources:` (SLURM: --gpus/--mem/--time/--cpus-per-task)
        resources:
            gpu=st.resources["gpu"],
            mem_mb=st.resources["mem_mb"],
            runtime=st.resources["runtime"],
            cpus_per_task=st.resources["cpus_per_task"],
            # one node and one task per job (torchrun --standalone starts the ranks itself); the
            # plugin would otherwise ask for one task per GPU when a job sets `tasks`
            nodes=1,
            tasks_per_gpu=0,
        params:
            # bound here, at definition time: a `shell:` expression would see the loop's last `st`
            cmd=st.shell,
            json=st.params_json(RAW_PARAMS),
        shell:
            "{params.cmd} > {log} 2>&1"
