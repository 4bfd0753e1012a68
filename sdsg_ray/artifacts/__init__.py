"""The contract between stages: one typed handle per artifact, each owning its file names, reader and writer.

A stage takes the handles of what it reads and returns the handle of what it writes; no stage spells a
file name. :class:`~sdsg_ray.artifacts.layout.RunLayout` hands out every handle of one pipeline run from
its root. The handles live beside the code that reads and writes their bytes:

=================  ==========================================  =======================================
module             handle                                      files
=================  ==========================================  =======================================
``dataset``        :class:`SyntheticDataset`                    images/, labels.csv, preview.png
``checkpoint``     :class:`ModelDir`                            inference.pt, discriminator.pt, model.safetensors
``scores``         :class:`ScoreSet`                            manifest/, scores/, summary.json
``selection``      :class:`FilteredSet`                         kept.parquet, report.json, figures, curation.html
``clusters``       :class:`ClusterFile`                         clusters.pt
``evaluation``     :class:`EvaluationResults`                   results.json, fid_vs_psi.png, truncation_grid.png
``report``         :class:`Report`                              index.html
``layout``         :class:`RunLayout`                           pipeline.json, config.yaml, _stages/
=================  ==========================================  =======================================

docs/architecture.md shows the same contract as a table; tests/test_project.py checks the two agree.
"""
