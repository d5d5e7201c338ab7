"""Teachers: multimodal models that score every label of a task (stage 2).

``protocol`` is the interface (``Teacher``, ``Case``, ``TeacherSpec``);
``loader`` finds a kind by name and loads or saves a teacher folder; ``fusion``
and ``clip`` are the kinds; ``train`` is the ``mint-ray teacher train`` stage.
Torch and transformers are imported by the kind modules, on first use.
"""

from mint_ray.teachers.loader import KINDS, load_teacher, save_teacher_dir
from mint_ray.teachers.protocol import SPEC_FILE, Case, SavableTeacher, Teacher, TeacherSpec, score_all, top_k_accuracy

__all__ = ["KINDS", "SPEC_FILE", "Case", "SavableTeacher", "Teacher", "TeacherSpec",
           "load_teacher", "save_teacher_dir", "score_all", "top_k_accuracy"]
