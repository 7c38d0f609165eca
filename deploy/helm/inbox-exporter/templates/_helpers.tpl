{{/*
Names. The usual chart conventions: nameOverride replaces the chart name, fullnameOverride the
release-qualified name (truncated to 63 characters, the DNS label limit).
*/}}
{{- define "inbox-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "inbox-exporter.fullname" -}}
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

{{- define "inbox-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "inbox-exporter.labels" -}}
helm.sh/chart: {{ include "inbox-exporter.chart" . }}
{{ include "inbox-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: inbox-exporter
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select the exporter's pods: stable across upgrades. */}}
{{- define "inbox-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inbox-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "inbox-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "inbox-exporter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "inbox-exporter.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Is the inbox list sharded over a StatefulSet? */}}
{{- define "inbox-exporter.sharded" -}}
{{- if gt (int .Values.shards) 1 }}true{{ end }}
{{- end }}

{{/* The Secret or ConfigMap holding config.yaml, and how the pod mounts it. */}}
{{- define "inbox-exporter.configVolume" -}}
{{- if .Values.existingConfigSecret }}
secret:
  secretName: {{ .Values.existingConfigSecret }}
  items:
    - key: {{ .Values.configKey }}
      path: config.yaml
{{- else if .Values.existingConfigMap }}
configMap:
  name: {{ .Values.existingConfigMap }}
  items:
    - key: {{ .Values.configKey }}
      path: config.yaml
{{- else }}
configMap:
  name: {{ include "inbox-exporter.fullname" . }}
  items:
    - key: config.yaml
      path: config.yaml
{{- end }}
{{- end }}

{{/*
checksum/config: changes whenever the configuration rendered from values changes, so the pods
roll. A Secret or ConfigMap the chart does not own cannot be read at render time: its name and
key are hashed instead; roll the pods yourself after changing it (see values.yaml).
*/}}
{{- define "inbox-exporter.configChecksum" -}}
{{- if or .Values.existingConfigSecret .Values.existingConfigMap }}
{{- printf "%s/%s/%s" (.Values.existingConfigSecret | default "") (.Values.existingConfigMap | default "") .Values.configKey | sha256sum }}
{{- else }}
{{- include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{/* The pod template shared by the Deployment (one replica) and the StatefulSet (shards). */}}
{{- define "inbox-exporter.podTemplate" -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (int .Values.shutdownGracePeriodSeconds) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than shutdownGracePeriodSeconds (%d): the kubelet would kill checks still finishing" (int .Values.terminationGracePeriodSeconds) (int .Values.shutdownGracePeriodSeconds)) }}
{{- end }}
metadata:
  labels:
    {{- include "inbox-exporter.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "inbox-exporter.configChecksum" . }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "inbox-exporter.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: inbox-exporter
      image: {{ include "inbox-exporter.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - run
        - --config.file=/etc/inbox-exporter/config.yaml
        - --web.listen-address=:{{ .Values.port }}
        - --log.level={{ .Values.log.level }}
        - --log.format={{ .Values.log.format }}
        - --shutdown.grace-period={{ .Values.shutdownGracePeriodSeconds }}s
        {{- if include "inbox-exporter.sharded" . }}
        - --shard.count={{ .Values.shards }}
        - --shard.index=hostname
        {{- end }}
        {{- range .Values.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      {{- with .Values.env }}
      env:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        - name: http
          containerPort: {{ .Values.port }}
          protocol: TCP
      {{- with .Values.livenessProbe }}
      livenessProbe:
        httpGet:
          path: /-/healthy
          port: http
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.readinessProbe }}
      readinessProbe:
        httpGet:
          path: /-/ready
          port: http
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/inbox-exporter
          readOnly: true
        {{- range .Values.extraSecretMounts }}
        - name: {{ .name }}
          mountPath: {{ .mountPath }}
          {{- with .subPath }}
          subPath: {{ . }}
          {{- end }}
          readOnly: true
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      {{- include "inbox-exporter.configVolume" . | trim | nindent 6 }}
    {{- range .Values.extraSecretMounts }}
    - name: {{ .name }}
      secret:
        secretName: {{ .secretName }}
        defaultMode: {{ .defaultMode | default 0440 }}
        {{- with .items }}
        items:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- if hasKey . "optional" }}
        optional: {{ .optional }}
        {{- end }}
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
