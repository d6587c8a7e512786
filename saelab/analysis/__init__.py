"""Analyses on top of models and SAEs: linear probes, concept directions and steering (more to come)."""

from saelab.analysis.circles import DAYS_TASK, MONTHS_TASK, CalendarTask, calendar_study, fit_circle_probe
from saelab.analysis.clusters import graph_clusters, search_clusters, spectral_clusters
from saelab.analysis.concepts import LabelledTexts, Task, builtin, calendar, from_sources, from_templates, genre, \
    languages, load_labelled, split_documents, tasks
from saelab.analysis.probes import CausalInnerProduct, Features, Probe, concept_direction, extract, fit_probes, \
    neuron_hook, word_pair_direction
from saelab.analysis.report import ProbeRecord, ProbeResults, run_probes
from saelab.analysis.steering import LogitDiff, ProbeOutput, Steer, SteeringResult, WordFrequency, sweep
from saelab.analysis.alignment import Side, aligned_chunks, read_documents
from saelab.analysis.universality import MatchConfig, MatchResults, match_models

__all__ = ["CausalInnerProduct", "Features", "LabelledTexts", "LogitDiff", "Probe", "ProbeOutput", "ProbeRecord",
           "ProbeResults", "Steer", "SteeringResult", "Task", "WordFrequency", "builtin", "calendar",
           "concept_direction", "extract", "fit_probes", "from_sources", "from_templates", "genre", "languages",
           "load_labelled", "neuron_hook", "run_probes", "split_documents", "sweep", "tasks", "word_pair_direction"]
__all__ += ["CalendarTask", "DAYS_TASK", "MONTHS_TASK", "calendar_study", "fit_circle_probe", "graph_clusters",
            "search_clusters", "spectral_clusters"]
__all__ += ["MatchConfig", "MatchResults", "Side", "aligned_chunks", "match_models", "read_documents"]
