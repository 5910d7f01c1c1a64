{{/*
Names. The chart's objects are named "<fullname>-<component>"; with the release name
"vigil" (deploy/helm/render.sh) that gives vigil-exporter, vigil-alerts, ... as the raw
manifests always had.
*/}}
{{- define "vigil.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vigil.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "vigil.exporter.fullname" -}}
{{- printf "%s-exporter" (include "vigil.fullname" .) -}}
{{- end -}}

{{- define "vigil.installer.fullname" -}}
{{- printf "%s-installer" (include "vigil.fullname" .) -}}
{{- end -}}

{{- define "vigil.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. Extra label maps may not redefine the chart's own keys:
a key twice in one mapping is refused by kubectl and the API server. */}}
{{- define "vigil.labels" -}}
{{- range $what, $m := dict "commonLabels" .Values.commonLabels "serviceMonitor.labels" .Values.serviceMonitor.labels "podMonitor.labels" .Values.podMonitor.labels "prometheusRule.labels" .Values.prometheusRule.labels "exporter.podLabels" .Values.exporter.podLabels }}
{{- range $k, $_ := $m }}
{{- if regexMatch "^(app\\.kubernetes\\.io|helm\\.sh)/" $k }}
{{- fail (printf "%s: %s is one of the chart's own labels (app.kubernetes.io/*, helm.sh/*); choose another key" $what $k) }}
{{- end }}
{{- end }}
{{- end -}}
helm.sh/chart: {{ include "vigil.chart" . }}
app.kubernetes.io/part-of: vigil
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The exporter's selector labels (immutable on a DaemonSet: never add to these).
Pod templates carry them through vigil.labels (instance) and their own name label. */}}
{{- define "vigil.exporter.selectorLabels" -}}
app.kubernetes.io/name: vigil-exporter
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vigil.installer.selectorLabels" -}}
app.kubernetes.io/name: vigil-installer
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* image: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "vigil.image" -}}
{{- $img := index . 0 -}}
{{- $root := index . 1 -}}
{{- printf "%s:%s" $img.repository (toString (default $root.Chart.AppVersion $img.tag)) -}}
{{- end -}}

{{/* The job label the monitors force and the alert expressions select on. */}}
{{- define "vigil.jobSelector" -}}
{{- if .Values.prometheusRule.jobSelector -}}
{{- .Values.prometheusRule.jobSelector -}}
{{- else -}}
{{- printf "job=%q" .Values.monitoring.jobLabel -}}
{{- end -}}
{{- end -}}

{{/* Pod-level scheduling shared by the exporter and the installer DaemonSets. */}}
{{- define "vigil.scheduling" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The container securityContext every Vigil container runs with. */}}
{{- define "vigil.containerSecurityContext" -}}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The relabelings that give every target a `node` label (the pod's node). */}}
{{- define "vigil.nodeRelabeling" -}}
- sourceLabels: [__meta_kubernetes_pod_node_name]
  targetLabel: node
  action: replace
{{- end -}}
