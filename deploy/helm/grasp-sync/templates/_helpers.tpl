{{- define "grasp-sync.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "grasp-sync.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "grasp-sync.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "grasp-sync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "grasp-sync.selector" -}}
app.kubernetes.io/name: {{ include "grasp-sync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "grasp-sync.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "grasp-sync.controllerName" -}}
{{ include "grasp-sync.fullname" . | trunc 52 | trimSuffix "-" }}-controller
{{- end }}

{{- define "grasp-sync.workerName" -}}
{{ include "grasp-sync.fullname" . | trunc 52 | trimSuffix "-" }}-worker
{{- end }}

{{/* Worker pods, as many as there can ever be: their Lease names go into the Lease Role. */}}
{{- define "grasp-sync.maxWorkers" -}}
{{- if .Values.worker.autoscaling.enabled }}{{ .Values.worker.autoscaling.maxReplicas }}{{ else }}{{ max (int .Values.worker.replicas) (int .Values.worker.maxReplicas) }}{{ end }}
{{- end }}

{{- define "grasp-sync.required" -}}
{{- $_ := required "localRelay is required (ws:// or wss:// URL of your GRASP relay)" .Values.localRelay }}
{{- $_ := required "serviceDomain is required (your relay's public domain)" .Values.serviceDomain }}
{{- end }}

{{/* Environment shared by controller and worker. */}}
{{- define "grasp-sync.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: GRASP_SYNC_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: GRASP_SYNC_LOCAL_RELAY
  value: {{ .Values.localRelay | quote }}
- name: GRASP_SYNC_LOCAL_REREAD_EVERY
  value: {{ .Values.localRereadEvery | quote }}
{{- if .Values.metrics.bindPodIP }}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: GRASP_SYNC_METRICS_ADDR
  value: {{ printf "$(POD_IP):%d" (int .Values.metrics.port) | quote }}
{{- else }}
- name: GRASP_SYNC_METRICS_ADDR
  value: {{ printf "0.0.0.0:%d" (int .Values.metrics.port) | quote }}
{{- end }}
- name: GRASP_SYNC_LOG
  value: {{ .Values.log.level | quote }}
- name: GRASP_SYNC_LOG_FORMAT
  value: {{ .Values.log.format | quote }}
{{- with .Values.allow }}
- name: GRASP_SYNC_ALLOW
  value: {{ join "," . | quote }}
{{- end }}
{{- with .Values.denyNets }}
- name: GRASP_SYNC_DENY_NETS
  value: {{ join "," . | quote }}
{{- end }}
{{- end }}

{{- define "grasp-sync.probes" -}}
livenessProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 10
  failureThreshold: 6
readinessProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: 5
{{- end }}
