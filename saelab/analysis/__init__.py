"""Analyses on top of models and SAEs, as studies: each has a Config, a run_* entry point and a result built on
saelab.analysis.study.StudyResult (save, load, table).

    probing and steering: concepts, probes, report (ProbeConfig, run_probe_study), steering (SteerConfig, run_steering)
    matching across models: alignment, correlation, matching, similarity, universality (MatchStudyConfig, run_match)
    circular features: irreducibility, clusters (ClusterSearchConfig, run_cluster_search), circles (CalendarConfig,
    run_calendar)
"""

from saelab.analysis.circles import DAYS_TASK, MONTHS_TASK, CalendarConfig, CalendarStudy, CalendarTask, \
    calendar_study, fit_circle_probe, run_calendar
from saelab.analysis.clusters import ClusterSearch, ClusterSearchConfig, graph_clusters, run_cluster_search, \
    search_clusters, spectral_clusters
from saelab.analysis.concepts import LabelledTexts, Task, builtin, calendar, from_sources, from_templates, genre, \
    languages, load_labelled, split_documents, tasks
from saelab.analysis.probes import CausalInnerProduct, Features, Probe, concept_direction, extract, fit_probes, \
    neuron_hook, word_pair_direction
from saelab.analysis.report import ProbeConfig, ProbeRecord, ProbeResults, run_probe_study, run_probes
from saelab.analysis.steering import LogitDiff, ProbeOutput, Steer, SteerConfig, SteeringResult, WordFrequency, \
    run_steering, sweep
from saelab.analysis.study import StudyResult
from saelab.analysis.alignment import Side, aligned_chunks, read_documents
from saelab.analysis.universality import MatchConfig, MatchResults, MatchStudyConfig, match_models, run_match

__all__ = ["CausalInnerProduct", "Features", "LabelledTexts", "LogitDiff", "Probe", "ProbeOutput", "ProbeRecord",
           "ProbeResults", "Steer", "SteeringResult", "Task", "WordFrequency", "builtin", "calendar",
           "concept_direction", "extract", "fit_probes", "from_sources", "from_templates", "genre", "languages",
           "load_labelled", "neuron_hook", "run_probes", "split_documents", "sweep", "tasks", "word_pair_direction"]
__all__ += ["CalendarTask", "DAYS_TASK", "MONTHS_TASK", "calendar_study", "fit_circle_probe", "graph_clusters",
            "search_clusters", "spectral_clusters"]
__all__ += ["MatchConfig", "MatchResults", "Side", "aligned_chunks", "match_models", "read_documents"]
__all__ += ["CalendarConfig", "CalendarStudy", "ClusterSearch", "ClusterSearchConfig", "MatchStudyConfig",
            "ProbeConfig", "SteerConfig", "StudyResult", "run_calendar", "run_cluster_search", "run_match",
            "run_probe_study", "run_steering"]
