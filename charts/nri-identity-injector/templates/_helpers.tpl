{{/* The labels every object carries (and the DaemonSet's selector). */}}
{{- define "nii.labels" -}}
app.kubernetes.io/name: {{ .Values.name }}
{{- end }}

{{/* The image reference: the tag defaults to the chart's appVersion. */}}
{{- define "nii.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The runtime's name in prose. */}}
{{- define "nii.runtimeName" -}}
{{ if eq .Values.runtime "cri-o" }}CRI-O{{ else }}containerd{{ end }}
{{- end }}

{{/* The directory part of a path. */}}
{{- define "nii.dir" -}}
{{ dir . }}
{{- end }}

{{/* The CRI-O drop-in that enables NRI (openshift.machineConfig): one source for the
MachineConfig's file, the comment that shows it, and the NodeDisruptionPolicy's path. */}}
{{- define "nii.crioDropIn" -}}
{{- $mc := .Values.openshift.machineConfig -}}
# Written by the MachineConfigs 99-<pool>-{{ .Values.name }} (nri-identity-injector chart).
# CRI-O reads it after its own 00-default; it must be restarted to apply NRI settings.
[crio.nri]
# NRI is on by default from CRI-O 1.30 (OpenShift 4.17) but off before: say it.
enable_nri = true
# The socket the daemon connects to (its nri_socket).
nri_listen = {{ .Values.nriSocket | quote }}
# The daemon is an externally started plugin: connections must be allowed.
nri_disable_connections = false
# How long a connecting plugin may take to register.
nri_plugin_registration_timeout = {{ $mc.registrationTimeout | quote }}
# How long CRI-O waits for a plugin's answer to an event; the daemon answers within
# its own budgets, below this.
nri_plugin_request_timeout = {{ $mc.requestTimeout | quote }}

# NRI's built-in default validator (CRI-O 1.34 and later; older versions ignore this table).
[crio.nri.default_validator]
# On: a pod annotated required-plugins.noderesource.dev is refused while the daemon is
# not connected, instead of starting without its identity.
nri_enable_default_validator = {{ $mc.defaultValidator }}
# On CRI-O, the daemon holds a PID-mode container until its files are written with an
# OCI startContainer hook it adds through NRI: such adjustments must not be rejected.
nri_validator_reject_oci_hook_adjustment = false
{{- end }}
