# One rule per row of the stage table; each runs exactly one `effdetr` command.
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
        threads: (st.threads or workflow.cores) if st.heavy else 1
        params:
            # bound here, at definition time: a `shell:` expression would see the loop's last `st`
            cmd=st.shell,
            json=st.params_json(RAW_PARAMS),
        shell:
            "{params.cmd} > {log} 2>&1"
