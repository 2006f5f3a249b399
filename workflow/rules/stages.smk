# One rule per row of the stage table; each runs exactly one `effdetr` command.
for st in STAGES:

    rule:
        name:
            st.name
        input:
            stage_inputs(st),
        output:
            stage_outputs(st),
        params:
            json=st.params_json(RAW_PARAMS),
        log:
            st.log,
        threads: workflow.cores if st.heavy else 1
        shell:
            st.shell + " > {log} 2>&1"
