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

{{/*
oauthTokens: the writable volume for OAuth refresh tokens. With persistentVolumeClaim storage a
Deployment mounts one claim (existingClaim, or <fullname>-oauth-tokens from pvc.yaml); a
StatefulSet gets one claim per pod from its volumeClaimTemplates, so the pod spec has no volume.
*/}}
{{- define "inbox-exporter.oauthTokensPVC" -}}
{{- $o := .Values.oauthTokens }}
{{- if and $o.enabled (eq $o.storage "persistentVolumeClaim") }}
{{- if and $o.persistentVolumeClaim.existingClaim (include "inbox-exporter.sharded" .) }}
{{- fail "oauthTokens.persistentVolumeClaim.existingClaim works with shards: 1 only: with shards each pod gets its own claim (leave existingClaim empty)" }}
{{- end }}true
{{- end }}
{{- end }}

{{- define "inbox-exporter.oauthTokensClaimName" -}}
{{- .Values.oauthTokens.persistentVolumeClaim.existingClaim | default (printf "%s-oauth-tokens" (include "inbox-exporter.fullname" .)) }}
{{- end }}

{{/* A PersistentVolumeClaim's spec: the created claim and the StatefulSet's template. */}}
{{- define "inbox-exporter.oauthTokensClaimSpec" -}}
{{- $c := .Values.oauthTokens.persistentVolumeClaim -}}
accessModes:
  {{- toYaml $c.accessModes | nindent 2 }}
{{- with $c.storageClassName }}
storageClassName: {{ . | quote }}
{{- end }}
resources:
  requests:
    storage: {{ $c.size | quote }}
{{- end }}

{{/*
The init container's script: copy each key of the seed Secret ($1) to the token directory ($2),
mode 0600, when the file is missing or the key changed since it was last copied (its digest is
kept in $2/.seeded/); a token the exporter rotated since is left alone. Files are replaced
atomically (a temporary file, then mv).
*/}}
{{- define "inbox-exporter.oauthSeedScript" -}}
umask 077
seed="$1" dir="$2"
mkdir -p "$dir/.seeded"
for src in "$seed"/*; do
  [ -f "$src" ] || continue
  name="${src##*/}"
  digest="$(sha256sum < "$src")"
  if [ -s "$dir/$name" ] && [ "$(cat "$dir/.seeded/$name" 2>/dev/null || true)" = "$digest" ]; then
    echo "oauth-tokens: $name: kept (the Secret's value is unchanged since it was copied)"
    continue
  fi
  cp "$src" "$dir/.$name.tmp"
  chmod 0600 "$dir/.$name.tmp"
  mv -f "$dir/.$name.tmp" "$dir/$name"
  printf '%s\n' "$digest" > "$dir/.seeded/$name"
  echo "oauth-tokens: $name: copied from the Secret"
done
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
  {{- if and .Values.oauthTokens.enabled .Values.oauthTokens.existingSecret }}
  initContainers:
    # Seeds the writable refresh-token volume from the Secret (values.yaml: oauthTokens).
    - name: oauth-tokens
      image: {{ include "inbox-exporter.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command:
        - sh
        - -ec
        - |
          {{- include "inbox-exporter.oauthSeedScript" . | nindent 10 }}
        - oauth-tokens
        - /run/inbox-exporter/oauth-seed
        - {{ .Values.oauthTokens.mountPath }}
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: oauth-tokens
          mountPath: {{ .Values.oauthTokens.mountPath }}
        - name: oauth-tokens-seed
          mountPath: /run/inbox-exporter/oauth-seed
          readOnly: true
  {{- end }}
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
        {{- if .Values.oauthTokens.enabled }}
        - name: oauth-tokens
          mountPath: {{ .Values.oauthTokens.mountPath }}
        {{- end }}
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
    {{- $o := .Values.oauthTokens }}
    {{- if $o.enabled }}
    {{- if eq $o.storage "emptyDir" }}
    - name: oauth-tokens
      emptyDir:
        {{- with $o.emptyDir.medium }}
        medium: {{ . }}
        {{- end }}
        {{- with $o.emptyDir.sizeLimit }}
        sizeLimit: {{ . }}
        {{- end }}
    {{- else if not (include "inbox-exporter.sharded" .) }}
    - name: oauth-tokens
      persistentVolumeClaim:
        claimName: {{ include "inbox-exporter.oauthTokensClaimName" . }}
    {{- end }}
    {{- with $o.existingSecret }}
    - name: oauth-tokens-seed
      secret:
        secretName: {{ . }}
        defaultMode: 0440
    {{- end }}
    {{- end }}
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
